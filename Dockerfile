# The torch-free runtime server: onnxruntime, tokenizers, Pillow and FastAPI on uvicorn; no torch.
#   docker build -t zreward-fast-serve .
#   docker run -p 8000:8000 -v /path/to/bundle:/bundle:ro -e ZREWARD_API_KEY=... zreward-fast-serve
# Not built on the development machines (no container daemon there): see the README.
FROM python:3.11-slim

ENV PIP_NO_CACHE_DIR=1 PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /app
COPY setup.py README.md constraints.txt ./
COPY zreward_fast ./zreward_fast
# the package without its torch dependencies, then only what the runtime and the server import,
# at the versions the tests passed with
RUN pip install --no-deps . \
 && pip install -c constraints.txt numpy pillow onnxruntime tokenizers fastapi uvicorn prometheus-client \
 && python -c "import sys, zreward_fast.runtime.server; assert 'torch' not in sys.modules"

RUN useradd --system --uid 10001 zreward
USER zreward
EXPOSE 8000
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
  CMD python -c "import urllib.request, sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8000/readyz', timeout=4).status != 200)"
# the bundle is mounted at /bundle; 0.0.0.0 inside the container (set ZREWARD_API_KEY when the port is exposed)
CMD ["zreward-fast", "serve", "--bundle", "/bundle", "--host", "0.0.0.0", "--port", "8000"]
