-- Remote transactions that could not be applied yet (a unique index that is not the key, a
-- constraint the row does not meet here): parked whole, retried automatically, never dropped.
-- exception_retry(id) retries one now; exception_discard(id) gives up on one but keeps the row.
CREATE TABLE rbucardo.exceptions (
    id           bigserial PRIMARY KEY,
    at           timestamptz NOT NULL DEFAULT now(),
    origin       integer NOT NULL,
    origin_tick  bigint NOT NULL,
    origin_seq   bigint NOT NULL,
    via          integer NOT NULL,          -- the peer it came from
    hlc          bigint NOT NULL,
    chunks       bytea NOT NULL,            -- the transaction's chunks as received (postcard list)
    reason       text NOT NULL,
    retries      integer NOT NULL DEFAULT 0,
    last_retry   timestamptz,
    resolved_at  timestamptz,
    resolution   text CHECK (resolution IN ('applied', 'discarded'))
);
CREATE INDEX exceptions_open ON rbucardo.exceptions (id) WHERE resolved_at IS NULL;
