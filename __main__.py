import sys

from paiton.cli import main

sys.exit(main())
