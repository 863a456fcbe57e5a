-- Run once by the postgres image on an empty data folder: POSTGRES_DB (mlflow) exists; Prefect gets its own database.
CREATE DATABASE prefect;
