"""Serving past one process: a supervisor and its worker processes.

``framesock-server MODULE:ATTR --workers N`` and ``framesock.run()`` come here. The supervisor
(``supervisor.py``) binds the listening socket before anything else, then starts each worker
(``worker.py``) as a fresh interpreter (``sys.executable -m framesock.workers``, never a
fork, whatever the platform's multiprocessing start method). The workers share that one socket
and import the app themselves; what they tell the supervisor travels as JSON lines on a pipe
(``messages.py``).
"""
