import sys

from vtfuse.cli.main import main

sys.exit(main())
