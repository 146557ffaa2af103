"""Batch scoring of whole archives: ``pneumonia score INPUT --out OUT``.

- :mod:`~pneumonia.score.inputs`: folder trees, manifests, Parquet of image bytes (lazy).
- :mod:`~pneumonia.score.rows`: the output row and the one function that scores a batch.
- :mod:`~pneumonia.score.local`: the default engine (a process pool on this machine).
- :mod:`~pneumonia.score.ray_engine`: the same job on Ray Data (``pip install '.[ray]'``).
- :mod:`~pneumonia.score.output`: parts written atomically, resume, the final commit.
- :mod:`~pneumonia.score.job`: one job from input to summary.

Neither pyarrow nor Ray is imported until a Parquet file or the Ray engine is used.
"""

from pneumonia.score.inputs import open_input
from pneumonia.score.job import ENGINES, ScoreSummary, score_archive
from pneumonia.score.rows import ScoreError, ScoreRow

__all__ = ["ENGINES", "ScoreError", "ScoreRow", "ScoreSummary", "open_input", "score_archive"]
