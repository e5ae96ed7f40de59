"""``python -m framesock.workers CONFIG``: how the supervisor starts a worker process."""

import sys

from framesock.workers.worker import main

sys.exit(main(sys.argv[1:]))
