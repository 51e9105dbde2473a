//! The one way every sluice process connects to PostgreSQL: libpq's TLS parameters in the
//! URL (`sslmode`, `sslrootcert`, `sslcert`, `sslkey`), an OpenSSL connector built from them,
//! the URL redacted for logs, and connection errors rendered as one line that names the
//! setting to fix.
//!
//! tokio-postgres parses the rest of the URL but knows only `sslmode` disable, prefer and
//! require, and nothing of certificates; [`DbTarget::parse`] therefore takes the TLS
//! parameters out, keeps libpq's meaning for them, and hands tokio-postgres what it knows.
//! OpenSSL (not rustls) because librdkafka in the same process is built against the
//! system's OpenSSL already: one TLS library, one set of CA paths, one thing to patch.

use std::path::{Path, PathBuf};
use std::time::Duration;

use openssl::ssl::{SslConnector, SslFiletype, SslMethod, SslVerifyMode};
use openssl::x509::store::X509StoreBuilder;
use openssl::x509::X509;
use postgres_openssl::MakeTlsConnector;

use crate::SchemaError;

/// libpq's `sslmode`, with libpq's meanings (default [`SslMode::Prefer`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SslMode {
    /// Plain TCP only.
    Disable,
    /// TLS when the server offers it, else plain; the certificate is not checked (unless
    /// `sslrootcert` is given, as in libpq).
    Prefer,
    /// TLS or no connection; the certificate is not checked unless `sslrootcert` is given,
    /// which makes it [`SslMode::VerifyCa`] (libpq's rule).
    Require,
    /// TLS, the server's chain checked against `sslrootcert`; the host name is not.
    VerifyCa,
    /// TLS, the chain checked and the certificate issued to the host connected to.
    VerifyFull,
}

impl SslMode {
    fn parse(value: &str) -> Result<SslMode, SchemaError> {
        Ok(match value {
            "disable" => SslMode::Disable,
            // libpq's `allow` tries plain first; "TLS if offered" is the safe reading of it.
            "allow" | "prefer" => SslMode::Prefer,
            "require" => SslMode::Require,
            "verify-ca" => SslMode::VerifyCa,
            "verify-full" => SslMode::VerifyFull,
            other => {
                return Err(url_error(format!(
                    "sslmode={other} is not one of disable, prefer, require, verify-ca, verify-full"
                )))
            }
        })
    }
}

/// Where the CAs that sign the server's certificate come from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RootCert {
    /// A PEM file of one or more CA certificates (`sslrootcert=/path`); only these are trusted.
    File(PathBuf),
    /// The operating system's store (`sslrootcert=system`: OpenSSL's default paths).
    System,
}

/// The TLS half of a database URL.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TlsSettings {
    /// `sslmode`, after libpq's rules (a root certificate upgrades `prefer`/`require`).
    pub mode: SslMode,
    /// `sslrootcert`, when given.
    pub root_cert: Option<RootCert>,
    /// `sslcert` and `sslkey`: a client certificate chain (PEM) and its unencrypted key.
    pub client_cert: Option<(PathBuf, PathBuf)>,
}

impl TlsSettings {
    /// True when the server's chain is checked.
    pub fn verifies_chain(&self) -> bool {
        matches!(self.mode, SslMode::VerifyCa | SslMode::VerifyFull) || self.root_cert.is_some()
    }
}

/// A parsed database URL: what tokio-postgres takes, plus the TLS settings it does not know.
#[derive(Debug, Clone)]
pub struct DbTarget {
    /// Everything but TLS, with `ssl_mode` set to what tokio-postgres should negotiate.
    pub config: tokio_postgres::Config,
    /// The TLS parameters, with libpq's meaning.
    pub tls: TlsSettings,
    /// The URL with its password replaced by `***`, for logs and errors.
    pub redacted: String,
}

impl DbTarget {
    /// Parses a libpq URL (`postgres://user:password@host:port/db?sslmode=...`) or key/value
    /// string (`host=... sslmode=...`). Reads no file: see [`DbTarget::connector`].
    pub fn parse(url: &str) -> Result<DbTarget, SchemaError> {
        let redacted = redact(url);
        let (rest, params) = split_tls_params(url)?;
        let mut mode = None;
        let mut root_cert = None;
        let mut cert = None;
        let mut key = None;
        for (name, value) in params {
            match name.as_str() {
                "sslmode" => mode = Some(SslMode::parse(&value)?),
                "sslrootcert" if value == "system" => root_cert = Some(RootCert::System),
                "sslrootcert" => root_cert = Some(RootCert::File(PathBuf::from(value))),
                "sslcert" => cert = Some(PathBuf::from(value)),
                "sslkey" => key = Some(PathBuf::from(value)),
                "sslpassword" => {
                    return Err(url_error(
                        "sslpassword (an encrypted client key) is not supported: give sslkey an \
                         unencrypted key file, readable only by the service"
                            .into(),
                    ))
                }
                _ => {}
            }
        }
        // libpq 16: sslrootcert=system defaults to, and only allows, verify-full: the OS store
        // trusts every public CA, so only the host name check ties a certificate to the server.
        let mode = match (mode, &root_cert) {
            (None, Some(RootCert::System)) => SslMode::VerifyFull,
            (Some(m), Some(RootCert::System)) if m != SslMode::VerifyFull => {
                return Err(url_error(
                    "sslrootcert=system needs sslmode=verify-full (any public CA would do \
                     otherwise)"
                        .into(),
                ))
            }
            (None, _) => SslMode::Prefer,
            (Some(m), _) => m,
        };
        if matches!(mode, SslMode::VerifyCa | SslMode::VerifyFull) && root_cert.is_none() {
            let name = if mode == SslMode::VerifyCa {
                "verify-ca"
            } else {
                "verify-full"
            };
            return Err(url_error(format!(
                "sslmode={name} needs sslrootcert: the CA file that signed the server's \
                 certificate, or sslrootcert=system for the operating system's store"
            )));
        }
        let client_cert = match (cert, key) {
            (Some(c), Some(k)) => Some((c, k)),
            (None, None) => None,
            _ => {
                return Err(url_error(
                    "sslcert and sslkey go together: give both, or neither".into(),
                ))
            }
        };
        let mut config: tokio_postgres::Config = rest.parse().map_err(|e| {
            url_error(format!(
                "{redacted} is not a PostgreSQL URL: {}",
                error_chain(&e)
            ))
        })?;
        config.ssl_mode(match mode {
            SslMode::Disable => tokio_postgres::config::SslMode::Disable,
            SslMode::Prefer => tokio_postgres::config::SslMode::Prefer,
            _ => tokio_postgres::config::SslMode::Require,
        });
        if config.get_connect_timeout().is_none() {
            // The OS's own timeout is minutes; a service's start-up and probes want seconds.
            config.connect_timeout(Duration::from_secs(10));
        }
        Ok(DbTarget {
            config,
            tls: TlsSettings {
                mode,
                root_cert,
                client_cert,
            },
            redacted,
        })
    }

    /// The TLS connector for these settings; reads the certificate and key files, so a
    /// missing or malformed one is reported at start-up, naming the URL parameter.
    pub fn connector(&self) -> Result<MakeTlsConnector, SchemaError> {
        let tls_err = |what: String| SchemaError::DatabaseTls(what);
        let openssl = |what: &str, path: &Path| {
            let what = what.to_owned();
            let path = path.display().to_string();
            move |e: openssl::error::ErrorStack| {
                tls_err(format!(
                    "{what} {path}: {e}; fix {what} in SLUICE_DATABASE_URL"
                ))
            }
        };
        let mut builder = SslConnector::builder(SslMethod::tls_client())
            .map_err(|e| tls_err(format!("cannot set up OpenSSL: {e}")))?;
        if self.tls.verifies_chain() {
            builder.set_verify(SslVerifyMode::PEER);
            if let Some(RootCert::File(path)) = &self.tls.root_cert {
                // Only the given CAs: the builder's default store would also trust every CA
                // the OS knows, which is not what sslrootcert=/file means in libpq.
                let pem = std::fs::read(path).map_err(|e| {
                    tls_err(format!(
                        "sslrootcert {}: {e}; fix sslrootcert in SLUICE_DATABASE_URL",
                        path.display()
                    ))
                })?;
                let certs = X509::stack_from_pem(&pem).map_err(openssl("sslrootcert", path))?;
                if certs.is_empty() {
                    return Err(tls_err(format!(
                        "sslrootcert {} holds no PEM certificate; fix sslrootcert in \
                         SLUICE_DATABASE_URL",
                        path.display()
                    )));
                }
                let mut store = X509StoreBuilder::new().map_err(openssl("sslrootcert", path))?;
                for cert in certs {
                    store.add_cert(cert).map_err(openssl("sslrootcert", path))?;
                }
                builder.set_cert_store(store.build());
            }
        } else {
            builder.set_verify(SslVerifyMode::NONE);
        }
        if let Some((cert, key)) = &self.tls.client_cert {
            builder
                .set_certificate_chain_file(cert)
                .map_err(openssl("sslcert", cert))?;
            builder
                .set_private_key_file(key, SslFiletype::PEM)
                .map_err(openssl("sslkey", key))?;
            builder
                .check_private_key()
                .map_err(openssl("sslkey (does it belong to sslcert?)", key))?;
        }
        let mut connector = MakeTlsConnector::new(builder.build());
        if self.tls.mode != SslMode::VerifyFull {
            connector.set_callback(|config, _host| {
                config.set_verify_hostname(false);
                Ok(())
            });
        }
        Ok(connector)
    }

    /// Opens one connection and drives it on a background task; errors say what to fix.
    pub async fn connect(&self) -> Result<tokio_postgres::Client, SchemaError> {
        let connector = self.connector()?;
        let (client, conn) =
            self.config
                .connect(connector)
                .await
                .map_err(|e| SchemaError::Connect {
                    target: self.redacted.clone(),
                    cause: describe(&e),
                })?;
        tokio::spawn(async move {
            if let Err(err) = conn.await {
                tracing::warn!(cause = %describe(&err), "PostgreSQL connection ended");
            }
        });
        Ok(client)
    }
}

impl DbTarget {
    /// A deadpool manager connecting with these settings (pools of the writer and the
    /// collector's key store).
    pub fn manager(
        &self,
        config: deadpool_postgres::ManagerConfig,
    ) -> Result<deadpool_postgres::Manager, SchemaError> {
        Ok(deadpool_postgres::Manager::from_config(
            self.config.clone(),
            self.connector()?,
            config,
        ))
    }

    /// The connection pool of a service (the writer's lanes, the collector's key store):
    /// these settings' TLS connector, connections checked with `is_closed` on reuse
    /// (deadpool's fast recycling), and every wait bounded as `bounds` says.
    pub fn pool(&self, bounds: PoolBounds) -> Result<deadpool_postgres::Pool, SchemaError> {
        let manager = self.manager(deadpool_postgres::ManagerConfig::default())?;
        deadpool_postgres::Pool::builder(manager)
            .max_size(bounds.max_size.max(1))
            .runtime(deadpool_postgres::Runtime::Tokio1)
            .wait_timeout(Some(bounds.wait_timeout))
            .create_timeout(Some(bounds.create_timeout))
            .recycle_timeout(Some(bounds.recycle_timeout))
            .build()
            .map_err(|e| SchemaError::Pool(e.to_string()))
    }
}

/// The size and waits of a service's connection pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PoolBounds {
    /// Most connections open at once (at least 1).
    pub max_size: usize,
    /// Longest a caller waits for a free connection.
    pub wait_timeout: Duration,
    /// Longest one new connection may take.
    pub create_timeout: Duration,
    /// Longest the check of a returned connection may take.
    pub recycle_timeout: Duration,
}

/// A pool error as one line, with [`describe`]'s advice when a connection failed.
pub fn describe_pool(err: &deadpool_postgres::PoolError) -> String {
    use deadpool_postgres::PoolError;
    match err {
        PoolError::Backend(e) => describe(e),
        PoolError::Timeout(_) => "timed out waiting for a PostgreSQL connection; is PostgreSQL \
                                  running and reachable? check the host and port in \
                                  SLUICE_DATABASE_URL"
            .to_owned(),
        other => other.to_string(),
    }
}

/// Parses `url` and opens one connection: the short form of [`DbTarget::parse`] and
/// [`DbTarget::connect`] for tools and tests.
pub async fn connect(url: &str) -> Result<tokio_postgres::Client, SchemaError> {
    DbTarget::parse(url)?.connect().await
}

fn url_error(reason: String) -> SchemaError {
    SchemaError::DatabaseUrl(reason)
}

/// `url` with any password replaced by `***`: `postgres://user:***@host/db`, or
/// `password=***` in the key/value form. The query string is kept (file paths, modes).
pub fn redact(url: &str) -> String {
    if let Some(scheme_end) = url.find("://") {
        let body_start = scheme_end + 3;
        let body = &url[body_start..];
        let authority_end = body.find(['/', '?']).unwrap_or(body.len());
        let authority = &body[..authority_end];
        let mut out = url[..body_start].to_owned();
        // The last `@` ends the user info: a password may itself hold a raw `@`.
        match authority.rfind('@') {
            Some(at) => {
                let userinfo = &authority[..at];
                match userinfo.split_once(':') {
                    Some((user, _password)) => {
                        out.push_str(user);
                        out.push_str(":***");
                    }
                    None => out.push_str(userinfo),
                }
                out.push_str(&authority[at..]);
            }
            None => out.push_str(authority),
        }
        let tail = &body[authority_end..];
        out.push_str(&redact_query(tail));
        out
    } else {
        redact_key_values(url)
    }
}

fn redact_query(tail: &str) -> String {
    let Some((path, query)) = tail.split_once('?') else {
        return tail.to_owned();
    };
    let pairs: Vec<String> = query
        .split('&')
        .map(|pair| match pair.split_once('=') {
            Some((k, _)) if k == "password" || k == "sslpassword" => format!("{k}=***"),
            _ => pair.to_owned(),
        })
        .collect();
    format!("{path}?{}", pairs.join("&"))
}

fn redact_key_values(s: &str) -> String {
    match tokenize_key_values(s) {
        Ok(pairs) => pairs
            .into_iter()
            .map(|(k, v)| {
                if k == "password" || k == "sslpassword" {
                    format!("{k}=***")
                } else {
                    format!("{k}={}", quote_value(&v))
                }
            })
            .collect::<Vec<_>>()
            .join(" "),
        // Unparsable: nothing of it is safe to print.
        Err(_) => "(an unparsable connection string)".to_owned(),
    }
}

const TLS_PARAMS: [&str; 5] = ["sslmode", "sslrootcert", "sslcert", "sslkey", "sslpassword"];

/// Splits the TLS parameters off a URL or key/value string: (what tokio-postgres gets,
/// the TLS parameters with their values decoded).
fn split_tls_params(url: &str) -> Result<(String, Vec<(String, String)>), SchemaError> {
    let mut tls = Vec::new();
    if url.starts_with("postgres://") || url.starts_with("postgresql://") {
        let Some((base, query)) = url.split_once('?') else {
            return Ok((url.to_owned(), tls));
        };
        let mut kept = Vec::new();
        for pair in query.split('&').filter(|p| !p.is_empty()) {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            if TLS_PARAMS.contains(&key) {
                tls.push((key.to_owned(), percent_decode(value)?));
            } else {
                kept.push(pair);
            }
        }
        let rest = if kept.is_empty() {
            base.to_owned()
        } else {
            format!("{base}?{}", kept.join("&"))
        };
        Ok((rest, tls))
    } else if url.contains("://") {
        Err(url_error(format!(
            "{} does not start with postgres:// or postgresql://",
            redact(url)
        )))
    } else {
        let mut kept = Vec::new();
        for (key, value) in tokenize_key_values(url)? {
            if TLS_PARAMS.contains(&key.as_str()) {
                tls.push((key, value));
            } else {
                kept.push(format!("{key}={}", quote_value(&value)));
            }
        }
        Ok((kept.join(" "), tls))
    }
}

/// libpq's key/value form: `key=value` pairs split by spaces; a value may be single-quoted,
/// with `\'` and `\\` escapes inside.
fn tokenize_key_values(s: &str) -> Result<Vec<(String, String)>, SchemaError> {
    let mut out = Vec::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(out);
        }
        let mut key = String::new();
        while let Some(&c) = chars.peek() {
            if c == '=' || c.is_whitespace() {
                break;
            }
            key.push(c);
            chars.next();
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        if chars.next() != Some('=') {
            return Err(url_error(format!(
                "the connection string's parameter {key:?} has no `=value`"
            )));
        }
        while chars.peek().is_some_and(|c| c.is_whitespace()) {
            chars.next();
        }
        let mut value = String::new();
        if chars.peek() == Some(&'\'') {
            chars.next();
            loop {
                match chars.next() {
                    Some('\'') => break,
                    Some('\\') => value.extend(chars.next()),
                    Some(c) => value.push(c),
                    None => {
                        return Err(url_error(format!(
                            "the connection string's parameter {key:?} has an unclosed quote"
                        )))
                    }
                }
            }
        } else {
            while let Some(&c) = chars.peek() {
                if c.is_whitespace() {
                    break;
                }
                value.push(c);
                chars.next();
            }
        }
        out.push((key, value));
    }
}

fn quote_value(v: &str) -> String {
    if !v.is_empty() && !v.contains([' ', '\'', '\\']) {
        return v.to_owned();
    }
    format!("'{}'", v.replace('\\', "\\\\").replace('\'', "\\'"))
}

fn percent_decode(s: &str) -> Result<String, SchemaError> {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| url_error(format!("bad %-escape in URL parameter {s:?}")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out).map_err(|_| url_error(format!("URL parameter {s:?} is not UTF-8")))
}

/// An error and its causes on one line (tokio-postgres's own text is only the first link:
/// "error performing TLS handshake", without why).
fn error_chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
        source = cause.source();
    }
    out
}

/// A connection or query error as one line: the server's or the library's words, then which
/// setting to fix when the cause is one an operator can fix (credentials, CA, host name,
/// TLS required or refused, host and port). Never holds the password.
pub fn describe(err: &tokio_postgres::Error) -> String {
    if let Some(db) = err.as_db_error() {
        let code = db.code().code();
        // Severity and SQLSTATE let an operator (and a dead letter's reader) tell a refused
        // row (class 22/23) from a missing table or a failed login at a glance.
        let mut msg = format!("{}: {} (SQLSTATE {code})", db.severity(), db.message());
        if let Some(detail) = db.detail() {
            msg.push_str(&format!(": {detail}"));
        }
        if let Some(hint) = db.hint() {
            msg.push_str(&format!("; hint: {hint}"));
        }
        let fix = match code {
            // invalid_password
            "28P01" => Some(
                "check the user and password in SLUICE_DATABASE_URL (or the file named by \
                 SLUICE_DATABASE_URL_FILE)",
            ),
            // invalid_authorization_specification: pg_hba refused this kind of connection.
            "28000" if msg.contains("no encryption") => Some(
                "the server accepts only encrypted connections: set sslmode=verify-full (or \
                 require) in SLUICE_DATABASE_URL",
            ),
            "28000" if msg.contains("certificate") => Some(
                "the server wants a client certificate: give sslcert and sslkey (signed by the \
                 CA the server trusts, its CN the user name) in SLUICE_DATABASE_URL",
            ),
            "28000" => Some("the server's pg_hba.conf refuses this user, database or address"),
            // invalid_catalog_name
            "3D000" => Some("check the database name in SLUICE_DATABASE_URL"),
            _ => None,
        };
        if let Some(fix) = fix {
            msg.push_str("; ");
            msg.push_str(fix);
        }
        return msg;
    }
    let chain = error_chain(err);
    let fix = if chain.contains("certificate verify failed") {
        if chain.contains("hostname mismatch") || chain.contains("IP address mismatch") {
            "the server's certificate is not issued to the host in SLUICE_DATABASE_URL: connect \
             to a name the certificate lists, or use sslmode=verify-ca"
        } else {
            "the server's certificate is not signed by a CA in sslrootcert: fix sslrootcert in \
             SLUICE_DATABASE_URL (e.g. your provider's CA bundle)"
        }
    } else if chain.contains("server does not support TLS") {
        "the server has TLS off: turn ssl on in the server, or set sslmode=disable/prefer in \
         SLUICE_DATABASE_URL"
    } else if chain.contains("TLS handshake") {
        "check the TLS settings (sslmode, sslrootcert, sslcert, sslkey) in SLUICE_DATABASE_URL"
    } else if chain.contains("password missing") {
        "the server asks for a password: put it in SLUICE_DATABASE_URL (or \
         SLUICE_DATABASE_URL_FILE)"
    } else if chain.contains("error connecting to server") || chain.contains("timeout") {
        "is PostgreSQL running and reachable? check the host and port in SLUICE_DATABASE_URL"
    } else {
        return chain;
    };
    format!("{chain}; {fix}")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls(url: &str) -> TlsSettings {
        DbTarget::parse(url).unwrap().tls
    }

    #[test]
    fn passwords_are_redacted_in_urls_and_key_values() {
        assert_eq!(
            redact("postgres://sluice:s3cr%40t@db.example:5432/sluice?sslmode=verify-full"),
            "postgres://sluice:***@db.example:5432/sluice?sslmode=verify-full"
        );
        assert_eq!(redact("postgres://sluice@h/db"), "postgres://sluice@h/db");
        assert_eq!(
            redact("postgresql://u:p@ss@h/db"),
            "postgresql://u:***@h/db"
        );
        assert_eq!(
            redact("postgres://h/db?user=u&password=hunter2"),
            "postgres://h/db?user=u&password=***"
        );
        assert_eq!(
            redact("host=h user=u password='a b' dbname=d"),
            "host=h user=u password=*** dbname=d"
        );
        assert!(!redact("host=h password='unclosed").contains("unclosed"));
    }

    #[test]
    fn tls_parameters_are_taken_out_with_libpq_meanings() {
        let t = DbTarget::parse(
            "postgres://u:p@db.example:6432/sluice?sslmode=verify-full&sslrootcert=/etc/ca%20bundle.pem&application_name=x",
        )
        .unwrap();
        assert_eq!(t.tls.mode, SslMode::VerifyFull);
        assert_eq!(
            t.tls.root_cert,
            Some(RootCert::File("/etc/ca bundle.pem".into()))
        );
        assert_eq!(t.config.get_ports(), &[6432]);
        assert_eq!(t.config.get_application_name(), Some("x"));
        assert_eq!(t.config.get_password(), Some(&b"p"[..]));
        assert_eq!(
            t.config.get_ssl_mode(),
            tokio_postgres::config::SslMode::Require
        );
        assert!(!t.redacted.contains(":p@"));

        assert_eq!(tls("postgres://u@h/db").mode, SslMode::Prefer);
        assert!(!tls("postgres://u@h/db?sslmode=require").verifies_chain());
        // libpq: require with a root certificate checks the chain, like verify-ca.
        assert!(tls("postgres://u@h/db?sslmode=require&sslrootcert=/ca.pem").verifies_chain());
        assert_eq!(
            DbTarget::parse("postgres://u@h/db?sslmode=disable")
                .unwrap()
                .config
                .get_ssl_mode(),
            tokio_postgres::config::SslMode::Disable
        );
        // The OS store implies, and requires, verify-full.
        assert_eq!(
            tls("postgres://u@h/db?sslrootcert=system").mode,
            SslMode::VerifyFull
        );
        assert!(DbTarget::parse("postgres://u@h/db?sslrootcert=system&sslmode=require").is_err());
        let kv = DbTarget::parse(
            "host=h port=5433 user=u password='x y' dbname=d sslmode=verify-ca sslrootcert='/c a.pem'",
        )
        .unwrap();
        assert_eq!(kv.tls.mode, SslMode::VerifyCa);
        assert_eq!(kv.tls.root_cert, Some(RootCert::File("/c a.pem".into())));
        assert_eq!(kv.config.get_password(), Some(&b"x y"[..]));
        assert_eq!(kv.config.get_ports(), &[5433]);
    }

    #[test]
    fn bad_tls_settings_are_refused_naming_what_to_fix() {
        let err = |url: &str| DbTarget::parse(url).unwrap_err().to_string();
        assert!(err("postgres://u@h/db?sslmode=verify-full").contains("needs sslrootcert"));
        assert!(err("postgres://u@h/db?sslmode=strict").contains("not one of"));
        assert!(err("postgres://u@h/db?sslcert=/c.pem").contains("sslkey"));
        assert!(err("postgres://u@h/db?sslpassword=x").contains("unencrypted"));
        let bad = err("postgres://u:hunter2@h/db?nonsense=1");
        assert!(bad.contains("nonsense"), "{bad}");
        assert!(!bad.contains("hunter2"), "{bad}");
        assert!(err("mysql://u:hunter2@h/db").contains("postgres://"));
        assert!(!err("mysql://u:hunter2@h/db").contains("hunter2"));
    }

    #[test]
    fn a_missing_ca_file_is_named_at_start_up() {
        let t = DbTarget::parse(
            "postgres://u@h/db?sslmode=verify-full&sslrootcert=/nonexistent/ca.pem",
        )
        .unwrap();
        let err = t.connector().err().unwrap().to_string();
        assert!(err.contains("/nonexistent/ca.pem"), "{err}");
        assert!(err.contains("sslrootcert"), "{err}");
    }
}
