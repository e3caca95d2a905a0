"""The nbdev setup.py: everything it needs is read from settings.ini."""
from configparser import ConfigParser

import setuptools

cfg = ConfigParser(delimiters=["="])
cfg.read("settings.ini", encoding="utf-8")
cfg = cfg["DEFAULT"]

licenses = {"apache2": "Apache-2.0"}
statuses = ["Planning", "Pre-Alpha", "Alpha", "Beta", "Production/Stable", "Mature", "Inactive"]


setuptools.setup(
    name=cfg["lib_name"],
    version=cfg["version"],
    description=cfg["description"],
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    author=cfg["author"],
    author_email=cfg["author_email"],
    url=cfg["git_url"],
    license=licenses[cfg["license"]],
    classifiers=[
        "Development Status :: " + f"{int(cfg['status'])} - {statuses[int(cfg['status'])]}",
        "Intended Audience :: " + cfg["audience"].title(),
        "Programming Language :: Python :: 3.11",
    ],
    packages=setuptools.find_packages(include=[cfg["lib_path"], cfg["lib_path"] + ".*"]),
    include_package_data=True,
    install_requires=cfg["requirements"].split(),
    extras_require={"train": cfg["train_requirements"].split(), "dev": cfg["dev_requirements"].split(),
                    "ops": cfg["ops_requirements"].split(), "spark": cfg["spark_requirements"].split(),
                    "store": cfg["store_requirements"].split()},
    python_requires=">=" + cfg["min_python"],
    zip_safe=False,
    entry_points={
        "console_scripts": cfg["console_scripts"].split("\n"),
        "nbdev": [f"{cfg['lib_path']}={cfg['lib_path']}._modidx:d"],
    },
)
