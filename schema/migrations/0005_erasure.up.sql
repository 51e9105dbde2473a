-- Erasure (docs/operations.md, "Erasure"): who has been erased, so that messages for them
-- still in Kafka, or sent later, are dropped by the writer instead of storing the person
-- again. Written by `sluice-schema erase` and `sluice-schema tenant delete`; read by every
-- writer incrementally by id, inside each batch's transaction.
--
-- No plaintext: user and anonymous ids are kept as SHA-256 of the id, email and phone as the
-- HMAC fingerprint lead already uses (schema/src/pii.rs), a whole tenant with an empty one.
-- No foreign key to tenant: the row of a deleted tenant must outlive it.
CREATE TABLE erasure_suppression (
    id           bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id    bigint      NOT NULL,
    kind         text        NOT NULL CHECK (kind IN ('tenant', 'user_id', 'anonymous_id', 'email', 'phone')),
    fingerprint  bytea       NOT NULL,
    erased_at    timestamptz NOT NULL DEFAULT now(),
    CONSTRAINT erasure_suppression_fingerprint_shape CHECK (
        (kind = 'tenant') = (octet_length(fingerprint) = 0)
        AND (kind = 'tenant' OR octet_length(fingerprint) = 32)),
    UNIQUE (tenant_id, kind, fingerprint)
);
