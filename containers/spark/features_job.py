"""The Python file spark-submit runs for the features job: `mlpay-features --engine spark ARGS` (mlpay.spark.main).

spark-submit takes a `.py` file, not a console script or a module, and mlpay's modules import their package
relatively, so they cannot be that file themselves. A SparkApplication (containers/k8s/spark/features.yaml) names this
file inside the image; tests/test_spark.py runs it with spark-submit in local mode.
"""
from mlpay.spark import main

if __name__ == "__main__":
    main()
