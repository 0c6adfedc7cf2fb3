-- The request a change came from (the caller's X-Request-Id when it sent
-- one, else the server's id): watchers carry it on, so one id follows a
-- request through every component that acts on the change.
ALTER TABLE changes ADD COLUMN request_id TEXT NOT NULL DEFAULT '';
