from jobstream.service import run
from services.worker.server import serve

run("worker", serve)
