-- Run once by the postgres image on an empty data folder (/docker-entrypoint-initdb.d), as
-- POSTGRES_USER: the constellation replicas use POSTGRES_DB (omega), the federation worker its
-- own database. Both migrate their schema themselves at start-up.
CREATE DATABASE omega_federation OWNER omega;
