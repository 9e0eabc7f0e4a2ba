"""Example DAGs for the LeadSquared provider, shipped in the package so ``pip install`` users get them.

- ``lsq_register_new_applicants``: the warehouse-to-LeadSquared transfer with its ledger, daily.
- ``lsq_register_from_upstream``: register the leads an upstream task produced (an XComArg).
- :mod:`~airflow_provider_lsq.example_dags.seed_warehouse`: the demo warehouse of synthetic applicants.
- :mod:`~airflow_provider_lsq.example_dags.demo`: runs the first DAG end to end against the local
  sandbox: ``python -m airflow_provider_lsq.example_dags.demo``.

To load the DAGs in your own Airflow, point a DAG bundle (Airflow 3) or ``dags_folder`` at this
directory, or copy the files into your DAGs folder. ``.airflowignore`` keeps the helper modules out of
DAG parsing.
"""
