DROP TABLE api_key;
DROP TABLE workspace;
DROP TABLE tenant;
