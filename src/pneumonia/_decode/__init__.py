"""The per-format decoders behind :mod:`pneumonia.preprocess` (private: import that instead).

``base`` holds what they all share (errors, memory ceilings, the strip-reduce helper);
``pillow`` what JPEG and PNG share; ``jpeg``, ``png`` and ``dicom`` one format each, with the
memory each decoder's library holds and the integrity checks its format allows.
"""
