-- The demo's store schema: what a Point of Sale writes, reduced to its shape. Loaded on every
-- node before replication starts (schema changes are not replicated yet).
CREATE EXTENSION rbucardo;

CREATE TABLE users (
    id     serial PRIMARY KEY,
    login  text NOT NULL UNIQUE,
    name   text NOT NULL
);
CREATE TABLE products (
    id     serial PRIMARY KEY,
    name   text NOT NULL,
    price  numeric(10, 2) NOT NULL,
    stock  integer NOT NULL
);
CREATE TABLE pos_order (
    id       serial PRIMARY KEY,
    cashier  integer REFERENCES users,
    created  timestamptz NOT NULL DEFAULT now(),
    total    numeric(12, 2) NOT NULL DEFAULT 0
);
CREATE TABLE pos_order_line (
    id          serial PRIMARY KEY,
    order_id    integer NOT NULL REFERENCES pos_order ON DELETE CASCADE,
    product_id  integer NOT NULL REFERENCES products,
    qty         integer NOT NULL,
    price       numeric(10, 2) NOT NULL
);
-- Odoo-style many2many table: no primary key, a unique index on NOT NULL columns.
CREATE TABLE product_tag_rel (
    product_id  integer NOT NULL,
    tag         text NOT NULL,
    UNIQUE (product_id, tag)
);

-- n products with a tag each.
CREATE FUNCTION demo_catalogue(n integer) RETURNS void LANGUAGE sql AS $$
    WITH p AS (
        INSERT INTO products (name, price, stock)
        SELECT 'product ' || g, (g % 50) + 0.99, 1000 FROM generate_series(1, n) g
        RETURNING id)
    INSERT INTO product_tag_rel SELECT id, 'new' FROM p;
$$;

-- n sales in one transaction: a cashier (created on first use), an order and its lines.
CREATE FUNCTION demo_sell(n integer) RETURNS void LANGUAGE plpgsql AS $$
DECLARE
    me text := (SELECT name FROM rbucardo.node);
    cashier integer;
    o integer;
BEGIN
    INSERT INTO users (login, name) VALUES ('cashier@' || me, 'Cashier of ' || me)
        ON CONFLICT (login) DO NOTHING;
    SELECT id INTO cashier FROM users WHERE login = 'cashier@' || me;
    FOR i IN 1 .. n LOOP
        INSERT INTO pos_order (cashier) VALUES (cashier) RETURNING id INTO o;
        INSERT INTO pos_order_line (order_id, product_id, qty, price)
        SELECT o, id, 1 + (i % 3), price FROM products ORDER BY random() LIMIT 3;
        -- Stock goes down on every node; rbucardo adds the decrements up (a delta column).
        UPDATE products p SET stock = p.stock - l.qty FROM pos_order_line l
         WHERE l.order_id = o AND l.product_id = p.id;
        UPDATE pos_order SET total = (SELECT sum(qty * price) FROM pos_order_line WHERE order_id = o)
         WHERE id = o;
    END LOOP;
END $$;
