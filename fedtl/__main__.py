import sys

from fedtl.cli import main

sys.exit(main())
