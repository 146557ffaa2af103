"""Class names and the positive class, shared by every side; imports nothing."""

#: Index 0 is the negative class, index 1 the positive class (the model's logit is for it).
LABELS: tuple[str, str] = ("NORMAL", "PNEUMONIA")
POSITIVE_LABEL = LABELS[1]
