# One image for every role of the pod (router, prefill, decode, attention, expert, kv pool,
# fabric simulator, namespace holder); compose.yaml picks the role with the command
# `python -m services.run --name NAME`. Build: `docker compose build` (or `docker build -t
# xdeepserve:local .`). Without a registry, make python:3.11-slim first: docker/base/build.sh.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# Dependencies first (their layer survives code changes): install the project's requirements
# from pyproject.toml (the only list of them).
WORKDIR /app
COPY pyproject.toml README.md ./
RUN python -c "import tomllib; print(*tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies'], sep='\n')" \
        > /tmp/requirements.txt \
 && pip install --quiet -r /tmp/requirements.txt

COPY proto/ proto/
COPY services/ services/
COPY xccl_net/ xccl_net/
COPY fabric_sim/ fabric_sim/
RUN pip install --quiet --no-deps . && python -m compileall -q /app

# Model weights, made once at build (deterministic from preset + seed) and read-only at run
# time: owned by root, the services run as an unprivileged user.
ARG MODEL_PRESET=tiny
ARG MODEL_SEED=0
RUN xds model init --preset "$MODEL_PRESET" --seed "$MODEL_SEED" \
        --out "/opt/xds/models/$MODEL_PRESET-seed$MODEL_SEED" >/dev/null

RUN useradd --uid 10001 --create-home --shell /usr/sbin/nologin xds \
 && mkdir -p /run/xds && chown xds:xds /run/xds
USER xds
# Services handle SIGTERM themselves (stop accepting, drain, exit): `docker compose down` is quick.
STOPSIGNAL SIGTERM
CMD ["python", "-m", "services.run", "--help"]
