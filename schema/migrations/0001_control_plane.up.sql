-- Control plane: who may send data (tenants, their workspaces, and write keys).
-- Small, rarely written tables, so foreign keys and CHECKs cost nothing worth saving here.

CREATE TABLE tenant (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name        text        NOT NULL CHECK (length(btrim(name)) BETWEEN 1 AND 200),
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE workspace (
    id          bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- Deleting a tenant deletes everything it owns: tenant erasure is one statement.
    tenant_id   bigint      NOT NULL REFERENCES tenant (id) ON DELETE CASCADE,
    name        text        NOT NULL CHECK (length(btrim(name)) BETWEEN 1 AND 200),
    created_at  timestamptz NOT NULL DEFAULT now(),
    -- Target of composite foreign keys, so a child row cannot name a workspace of another
    -- tenant; also the index behind the tenant foreign key.
    UNIQUE (tenant_id, id),
    UNIQUE (tenant_id, name)
);

CREATE TABLE api_key (
    id            bigint      GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id     bigint      NOT NULL,
    workspace_id  bigint      NOT NULL,
    name          text,
    -- Lookup prefix of the key (schema/src/apikey.rs): one index probe per request.
    prefix        text        NOT NULL UNIQUE CHECK (prefix ~ '^[0-9A-Za-z]{8}$'),
    -- SHA-256 of the whole key; the plaintext is never stored.
    hash          bytea       NOT NULL CHECK (octet_length(hash) = 32),
    scopes        text[]      NOT NULL DEFAULT '{write}'
                  CHECK (cardinality(scopes) >= 1 AND scopes <@ ARRAY['write', 'read', 'admin']),
    created_at    timestamptz NOT NULL DEFAULT now(),
    last_used_at  timestamptz,
    expires_at    timestamptz CONSTRAINT api_key_expires_after_creation CHECK (expires_at > created_at),
    revoked_at    timestamptz CONSTRAINT api_key_revoked_after_creation CHECK (revoked_at >= created_at),
    FOREIGN KEY (tenant_id, workspace_id) REFERENCES workspace (tenant_id, id) ON DELETE CASCADE
);

-- Serves the foreign key (cascading deletes) and "keys of this workspace" listings.
CREATE INDEX api_key_tenant_workspace_idx ON api_key (tenant_id, workspace_id);
