-- Identity: visitors (anonymous ids), leads (known people, PII encrypted) and the links
-- between them. visitor is on the writer's hot path, so it has no foreign keys: each would
-- cost a lookup per upserted row. tenant_id leads every key (isolation; Citus distribution).

CREATE TABLE visitor (
    tenant_id           bigint      NOT NULL,
    -- Client-made, so unique only inside a tenant.
    anonymous_id        text        NOT NULL CHECK (anonymous_id <> ''),
    workspace_id        bigint      NOT NULL,
    user_id             text,
    first_seen_at       timestamptz NOT NULL,
    last_seen_at        timestamptz NOT NULL,
    event_count         bigint      NOT NULL DEFAULT 0 CHECK (event_count >= 0),
    first_utm           jsonb       NOT NULL DEFAULT '{}' CHECK (jsonb_typeof(first_utm) = 'object'),
    first_referrer      text,
    first_landing_page  text,
    user_agent          text,
    bot                 boolean     NOT NULL DEFAULT false,
    lead_id             bigint,
    PRIMARY KEY (tenant_id, anonymous_id),
    CONSTRAINT visitor_seen_in_order CHECK (last_seen_at >= first_seen_at)
);

-- "Visitors of this lead": only identified visitors are indexed, so the index stays small.
CREATE INDEX visitor_lead_idx ON visitor (tenant_id, lead_id) WHERE lead_id IS NOT NULL;

CREATE TABLE lead (
    tenant_id          bigint      NOT NULL,
    id                 bigint      GENERATED ALWAYS AS IDENTITY,
    workspace_id       bigint      NOT NULL,
    user_id            text,
    -- AES-256-GCM: 12-byte nonce || ciphertext || 16-byte tag (schema/src/pii.rs).
    email_ciphertext   bytea       CHECK (octet_length(email_ciphertext) >= 28),
    phone_ciphertext   bytea       CHECK (octet_length(phone_ciphertext) >= 28),
    -- Which PII key sealed the ciphertexts; old keys stay readable after rotation.
    pii_key_id         text        CHECK (pii_key_id <> ''),
    -- HMAC-SHA256 of the normalised value: equality matching without plaintext.
    email_fingerprint  bytea       CHECK (octet_length(email_fingerprint) = 32),
    phone_fingerprint  bytea       CHECK (octet_length(phone_fingerprint) = 32),
    -- Traits without email/phone: those live only encrypted, never in plaintext JSON.
    traits             jsonb       NOT NULL DEFAULT '{}'
                       CHECK (jsonb_typeof(traits) = 'object' AND NOT traits ?| ARRAY['email', 'phone']),
    created_at         timestamptz NOT NULL DEFAULT now(),
    updated_at         timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (tenant_id, id),
    UNIQUE (tenant_id, email_fingerprint),
    UNIQUE (tenant_id, phone_fingerprint),
    UNIQUE (tenant_id, user_id),
    CONSTRAINT lead_ciphertext_has_key_id
        CHECK ((email_ciphertext IS NULL AND phone_ciphertext IS NULL) OR pii_key_id IS NOT NULL)
);

CREATE TABLE identity_link (
    tenant_id      bigint      NOT NULL,
    anonymous_id   text        NOT NULL CHECK (anonymous_id <> ''),
    lead_id        bigint      NOT NULL,
    kind           text        NOT NULL CHECK (kind IN ('identify', 'alias')),
    first_seen_at  timestamptz NOT NULL,
    last_seen_at   timestamptz NOT NULL,
    PRIMARY KEY (tenant_id, anonymous_id, lead_id),
    FOREIGN KEY (tenant_id, lead_id) REFERENCES lead (tenant_id, id) ON DELETE CASCADE,
    CONSTRAINT identity_link_seen_in_order CHECK (last_seen_at >= first_seen_at)
);

-- "Anonymous ids of this lead", and the index behind the cascading foreign key.
CREATE INDEX identity_link_lead_idx ON identity_link (tenant_id, lead_id);
