"""The label convention shared by the data pipeline, pseudo labels, the M-steps, metrics and pictures.

Class ids are ``0..K-1``; :data:`IGNORE_INDEX` marks a pixel without a label (void in the ground truth,
background or unlabelled in a pseudo label). It must not be a class id, so K < 255. Stored label maps are 8-bit
PNGs, so the value is part of the shard format. No imports: every module may depend on this one.
"""

IGNORE_INDEX = 255
