"""Apache Spark as an optional engine: training with MLlib K-Means, scoring with the service's own scorer.

Nothing else in the service imports this package: the command line does, and only for
`--engine spark`. pyspark (requirements-spark.txt) and a Java runtime are needed here only; a
version trained here is an ordinary version, which serving loads without Spark.
"""

from __future__ import annotations

import os
import shutil
import sys
from typing import Any

SPARK_MISSING = (
    "--engine spark needs pyspark and Java 17: pip install -r requirements-spark.txt "
    "(make install-spark), and apt-get install openjdk-17-jre-headless"
)


class SparkUnavailable(RuntimeError):
    """pyspark or a Java runtime is missing."""


def session(master: str, app_name: str = "customer-segmentation") -> Any:
    """A Spark session on `master` (local[N] or spark://host:7077), Arrow on for the Python functions."""
    try:
        from pyspark.sql import SparkSession
    except ImportError:
        raise SparkUnavailable(SPARK_MISSING) from None
    if shutil.which("java") is None and not _java_home():
        raise SparkUnavailable(SPARK_MISSING)
    # Python workers run this interpreter (with the service's packages) unless told otherwise;
    # on a cluster, PYSPARK_PYTHON names an interpreter every executor has.
    os.environ.setdefault("PYSPARK_PYTHON", sys.executable)
    return (
        SparkSession.builder.master(master)
        .appName(app_name)
        .config("spark.sql.execution.arrow.pyspark.enabled", "true")
        .config("spark.sql.shuffle.partitions", "8")
        .config("spark.ui.showConsoleProgress", "false")
        .getOrCreate()
    )


def _java_home() -> bool:
    home = os.environ.get("JAVA_HOME")
    return home is not None and os.path.exists(os.path.join(home, "bin", "java"))
