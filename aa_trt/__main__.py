import sys

from aa_trt.cli import main

sys.exit(main())
