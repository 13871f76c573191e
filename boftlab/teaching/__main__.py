"""``python -m boftlab.teaching student OUT | grade FOLDER | slides OUT``: the teacher kit (boftlab.teaching.kit)."""

import sys

from .kit import main

sys.exit(main())
