from jobstream.service import run
from services.gateway.server import serve

run("gateway", serve)
