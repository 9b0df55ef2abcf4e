"""`python -m cloudllm`: the console script's entry, plain local invokes included."""

import sys

from cloudllm.entry import main

sys.exit(main())
