import sys

from dicomfuse.cli.main import main

sys.exit(main())
