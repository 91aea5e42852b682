import sys

from aa_trt.cli import entry

sys.exit(entry())
