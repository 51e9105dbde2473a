DROP TABLE identity_link;
DROP TABLE lead;
DROP TABLE visitor;
