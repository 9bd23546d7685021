import sys

from scratchlm.serve import main

sys.exit(main())
