"""`sdtorch serve`: an HTTP API that AUTOMATIC1111's clients speak, and a web page, over the generation layer.

    from sdtorch.server import ServerConfig, create_app
    app = create_app(ServerConfig(model="shapes"))  # a FastAPI app: run it with uvicorn, or test it

The server imports what the CLI imports (generation, images, infotext, lora), never the CLI itself.
"""

from .app import create_app
from .service import ServerConfig, Service

__all__ = ["ServerConfig", "Service", "create_app"]
