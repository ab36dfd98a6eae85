import sys

from jaxgpt.cli.main import main

sys.exit(main())
