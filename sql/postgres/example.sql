-- sluice: a sample "shop" schema with seed rows, used by scripts/demo and docker-compose.yml.
-- Covers a few column types worth seeing in ClickHouse: bigserial keys, an enum, numeric(p,s),
-- timestamptz, jsonb, text[] and a composite primary key. Safe to run again (no new seed rows).

DO $$ BEGIN
  CREATE TYPE order_status AS ENUM ('new', 'paid', 'shipped', 'cancelled');
EXCEPTION WHEN duplicate_object THEN NULL;
END $$;

CREATE TABLE IF NOT EXISTS customers (
  id         bigserial PRIMARY KEY,
  email      text NOT NULL UNIQUE,
  name       text NOT NULL,
  tags       text[] NOT NULL DEFAULT '{}',
  created_at timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS orders (
  id          bigserial PRIMARY KEY,
  customer_id bigint NOT NULL REFERENCES customers (id) ON DELETE CASCADE,
  status      order_status NOT NULL DEFAULT 'new',
  total       numeric(12, 2) NOT NULL,
  details     jsonb,
  placed_at   timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS order_items (
  order_id   bigint NOT NULL REFERENCES orders (id) ON DELETE CASCADE,
  line       int NOT NULL,
  sku        text NOT NULL,
  quantity   int NOT NULL,
  unit_price numeric(10, 2) NOT NULL,
  PRIMARY KEY (order_id, line)
);

-- Seed rows (only into empty tables): rows that exist before sluice first starts arrive in
-- ClickHouse through the initial snapshot, later ones through streaming.
INSERT INTO customers (email, name, tags)
SELECT 'customer' || g || '@example.com', 'Customer ' || g, ARRAY['seed', 'tier' || (g % 3)]
FROM generate_series(1, 200) g
WHERE NOT EXISTS (SELECT 1 FROM customers);

INSERT INTO orders (customer_id, status, total, details)
SELECT 1 + (g % 200), 'paid', round((random() * 500)::numeric, 2),
       jsonb_build_object('channel', 'web', 'seed', true)
FROM generate_series(1, 500) g
WHERE NOT EXISTS (SELECT 1 FROM orders);

INSERT INTO order_items (order_id, line, sku, quantity, unit_price)
SELECT o.id, l, 'SKU-' || (o.id * 7 + l) % 100, 1 + l, round((random() * 100)::numeric, 2)
FROM orders o, generate_series(1, 2) l
WHERE NOT EXISTS (SELECT 1 FROM order_items);
