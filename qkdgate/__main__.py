import sys

from qkdgate.gateway.cli import main

sys.exit(main())
