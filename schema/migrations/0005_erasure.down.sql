-- Writers of this version stop suppressing erased people once the table is gone.
DROP TABLE erasure_suppression;
