"""``python -m train ...`` and ``torchrun --nproc_per_node=K -m train ...``: training
(``pconv-train``; see :mod:`train.cli` for the options)."""
from .cli import train_main

raise SystemExit(train_main())
