//! Certificates made by the test with the `openssl` CLI (the tool an operator would use): a
//! CA, a server certificate for `localhost` and 127.0.0.1 signed by it, a client
//! certificate, and a second, unrelated CA for the "unknown CA" cases. A missing `openssl`
//! fails the test; it does not skip it.

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};

use crate::unique_name;

/// A folder of PEM files, deleted on drop.
pub struct Certs {
    /// The folder.
    pub dir: PathBuf,
}

impl Certs {
    /// Makes every file (about a second of RSA and EC key generation).
    pub fn make() -> Result<Certs> {
        let dir = std::env::temp_dir().join(unique_name("sluice_certs"));
        std::fs::create_dir_all(&dir)?;
        let certs = Certs { dir };
        let d = &certs.dir;
        certs.ca("ca")?;
        certs.ca("other-ca")?;
        std::fs::write(
            d.join("server.ext"),
            "subjectAltName=DNS:localhost,IP:127.0.0.1\nextendedKeyUsage=serverAuth\n",
        )?;
        certs.leaf("server", "localhost", "server.ext")?;
        std::fs::write(d.join("client.ext"), "extendedKeyUsage=clientAuth\n")?;
        certs.leaf("client", "sluice", "client.ext")?;
        // Kafka's PEM keystore: the unencrypted PKCS#8 key, then the certificate chain.
        let mut keystore = std::fs::read(d.join("server.key"))?;
        keystore.extend(std::fs::read(d.join("server.crt"))?);
        keystore.extend(std::fs::read(d.join("ca.crt"))?);
        std::fs::write(d.join("server-keystore.pem"), keystore)?;
        // PostgreSQL runs as its own user and must read the folder and certificates.
        for entry in std::fs::read_dir(d)? {
            let path = entry?.path();
            set_mode(&path, 0o644)?;
        }
        set_mode(d, 0o755)?;
        Ok(certs)
    }

    /// Path of one file: `ca.crt`, `other-ca.crt`, `server.crt`, `server.key`,
    /// `server-keystore.pem`, `client.crt`, `client.key`.
    pub fn path(&self, name: &str) -> PathBuf {
        self.dir.join(name)
    }

    fn ca(&self, name: &str) -> Result<()> {
        openssl(
            &self.dir,
            &[
                "req",
                "-x509",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-days",
                "2",
                "-subj",
                &format!("/CN=sluice test {name}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.crt"),
            ],
        )
    }

    fn leaf(&self, name: &str, cn: &str, ext: &str) -> Result<()> {
        openssl(
            &self.dir,
            &[
                "req",
                "-newkey",
                "rsa:2048",
                "-nodes",
                "-subj",
                &format!("/CN={cn}"),
                "-keyout",
                &format!("{name}.key"),
                "-out",
                &format!("{name}.csr"),
            ],
        )?;
        openssl(
            &self.dir,
            &[
                "x509",
                "-req",
                "-in",
                &format!("{name}.csr"),
                "-CA",
                "ca.crt",
                "-CAkey",
                "ca.key",
                "-CAcreateserial",
                "-days",
                "2",
                "-extfile",
                ext,
                "-out",
                &format!("{name}.crt"),
            ],
        )
    }
}

impl Drop for Certs {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn openssl(dir: &Path, args: &[&str]) -> Result<()> {
    let out = Command::new("openssl")
        .args(args)
        .current_dir(dir)
        .output()
        .context("running openssl (apt-get install openssl)")?;
    if !out.status.success() {
        bail!(
            "openssl {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn set_mode(path: &Path, mode: u32) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode))
        .with_context(|| format!("chmod {}", path.display()))
}
