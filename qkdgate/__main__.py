import sys

from qkdgate.gateway.cli.main import main

sys.exit(main())
