-- A Dolibarr-shaped schema (customer orders) for the MariaDB tests, written for sync-daemon from
-- Dolibarr's public documentation of its tables: AUTO_INCREMENT rowids, multi-company `entity`
-- columns, order refs unique per entity with provisional refs "(PROV<rowid>)" until an order is
-- validated, lines keyed by rowid and pointing at the order's rowid. Only the columns the
-- import touches or the tests read; not a copy of Dolibarr's install files.
CREATE TABLE llx_c_country (
  rowid INT AUTO_INCREMENT PRIMARY KEY,
  code VARCHAR(2) NOT NULL,
  label VARCHAR(128) NOT NULL,
  active TINYINT NOT NULL DEFAULT 1,
  UNIQUE KEY uk_c_country_code (code)
);
CREATE TABLE llx_user (
  rowid INT AUTO_INCREMENT PRIMARY KEY,
  entity INT NOT NULL DEFAULT 1,
  login VARCHAR(50) NOT NULL,
  UNIQUE KEY uk_user_login (login, entity)
);
CREATE TABLE llx_societe (
  rowid INT AUTO_INCREMENT PRIMARY KEY,
  nom VARCHAR(128),
  entity INT NOT NULL DEFAULT 1,
  status TINYINT DEFAULT 1,
  client TINYINT DEFAULT 0,
  code_client VARCHAR(24),
  email VARCHAR(128),
  address VARCHAR(255),
  zip VARCHAR(25),
  town VARCHAR(50),
  fk_pays INT DEFAULT 0,
  datec DATETIME,
  fk_user_creat INT,
  UNIQUE KEY uk_societe_code_client (code_client, entity)
);
CREATE TABLE llx_socpeople (
  rowid INT AUTO_INCREMENT PRIMARY KEY,
  entity INT NOT NULL DEFAULT 1,
  fk_soc INT,
  lastname VARCHAR(50),
  firstname VARCHAR(50),
  address VARCHAR(255),
  zip VARCHAR(25),
  town VARCHAR(255),
  fk_pays INT DEFAULT 0,
  email VARCHAR(255),
  statut TINYINT NOT NULL DEFAULT 1,
  datec DATETIME,
  CONSTRAINT fk_socpeople_fk_soc FOREIGN KEY (fk_soc) REFERENCES llx_societe (rowid)
);
CREATE TABLE llx_product (
  rowid INT AUTO_INCREMENT PRIMARY KEY,
  ref VARCHAR(128) NOT NULL,
  entity INT NOT NULL DEFAULT 1,
  label VARCHAR(255) NOT NULL,
  price DECIMAL(24,8) DEFAULT 0,
  tva_tx DECIMAL(7,4),
  fk_product_type INT DEFAULT 0,
  UNIQUE KEY uk_product_ref (ref, entity)
);
CREATE TABLE llx_commande (
  rowid INT AUTO_INCREMENT PRIMARY KEY,
  ref VARCHAR(30) NOT NULL,
  entity INT NOT NULL DEFAULT 1,
  ref_client VARCHAR(255),
  fk_soc INT NOT NULL,
  date_creation DATETIME,
  date_commande DATE,
  fk_statut SMALLINT DEFAULT 0,
  total_ht DECIMAL(24,8) DEFAULT 0,
  total_tva DECIMAL(24,8) DEFAULT 0,
  total_ttc DECIMAL(24,8) DEFAULT 0,
  fk_user_author INT,
  fk_multicurrency INT,
  multicurrency_code VARCHAR(3),
  note_private TEXT,
  UNIQUE KEY uk_commande_ref (ref, entity),
  CONSTRAINT fk_commande_fk_soc FOREIGN KEY (fk_soc) REFERENCES llx_societe (rowid)
);
CREATE TABLE llx_commandedet (
  rowid INT AUTO_INCREMENT PRIMARY KEY,
  fk_commande INT NOT NULL,
  fk_product INT,
  label VARCHAR(255),
  description TEXT,
  tva_tx DECIMAL(7,4),
  qty DOUBLE,
  subprice DECIMAL(24,8),
  total_ht DECIMAL(24,8),
  total_tva DECIMAL(24,8),
  total_ttc DECIMAL(24,8),
  product_type INT DEFAULT 0,
  rang INT DEFAULT 0,
  CONSTRAINT fk_commandedet_fk_commande FOREIGN KEY (fk_commande) REFERENCES llx_commande (rowid)
);
INSERT INTO llx_c_country (code, label) VALUES ('FR', 'France'), ('DE', 'Germany'), ('AT', 'Austria');
INSERT INTO llx_user (entity, login) VALUES (1, 'admin'), (2, 'admin');
