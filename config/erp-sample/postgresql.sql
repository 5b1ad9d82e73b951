-- Sample ERP schema (PostgreSQL) used by config/mappings/orders.toml, the tests and the benchmark.
-- Customers, items, number series, order header (with the shop's e-number under a unique index,
-- and a posted flag), order lines.

CREATE TABLE customers (
    customer_no  varchar(20)  PRIMARY KEY,
    name         varchar(200) NOT NULL,
    email        varchar(200),
    street       varchar(200),
    zip          varchar(20),
    city         varchar(100),
    country      char(2),
    created_at   timestamp    NOT NULL DEFAULT now()
);
CREATE INDEX customers_email ON customers (lower(email));

CREATE TABLE items (
    item_no      varchar(20)  PRIMARY KEY,
    sku          varchar(64)  NOT NULL UNIQUE,
    description  varchar(200) NOT NULL,
    price        numeric(12,2) NOT NULL DEFAULT 0
);

-- One row per number series; the importer locks the row (SELECT ... FOR UPDATE) to take a number.
CREATE TABLE number_series (
    series       varchar(20)  PRIMARY KEY,
    prefix       varchar(10)  NOT NULL DEFAULT '',
    next_value   bigint       NOT NULL
);
INSERT INTO number_series (series, prefix, next_value) VALUES ('ORDER', 'SO', 100001), ('CUSTOMER', 'C', 50001);

CREATE TABLE order_header (
    order_no        varchar(20)   PRIMARY KEY,
    e_number        varchar(40),
    customer_no     varchar(20)   NOT NULL REFERENCES customers (customer_no),
    order_date      timestamp     NOT NULL,
    currency        char(3)       NOT NULL,
    total           numeric(12,2) NOT NULL,
    shipping_method varchar(20),
    payment_method  varchar(20),
    ship_name       varchar(200),
    ship_street     varchar(200),
    ship_zip        varchar(20),
    ship_city       varchar(100),
    ship_country    char(2),
    note            text,
    auto_invoice    boolean       NOT NULL DEFAULT false,
    status          varchar(20)   NOT NULL DEFAULT 'open',
    posted          boolean       NOT NULL DEFAULT false,
    created_at      timestamp     NOT NULL DEFAULT now()
);
-- Invariant "one ERP order per e-number": backed by the database, not only by the importer.
CREATE UNIQUE INDEX order_header_e_number ON order_header (e_number);

CREATE TABLE order_line (
    order_no     varchar(20)   NOT NULL REFERENCES order_header (order_no) ON DELETE CASCADE,
    line_no      integer       NOT NULL,
    item_no      varchar(20)   NOT NULL REFERENCES items (item_no),
    description  varchar(200),
    quantity     numeric(12,3) NOT NULL CHECK (quantity > 0),
    unit_price   numeric(12,2) NOT NULL,
    tax_code     varchar(10)   NOT NULL,
    PRIMARY KEY (order_no, line_no)
);

-- Master data the example mapping relies on: the guest customer and a few items.
INSERT INTO customers (customer_no, name) VALUES ('GUEST', 'Webshop guest');
INSERT INTO items (item_no, sku, description, price) VALUES
    ('I-0001', 'SKU-1', 'Sample item 1', 10.00),
    ('I-0002', 'SKU-2', 'Sample item 2', 20.00),
    ('I-0003', 'SKU-3', 'Sample item 3', 30.00);
