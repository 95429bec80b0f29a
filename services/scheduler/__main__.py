from jobstream.service import run
from services.scheduler.server import serve

run("scheduler", serve)
