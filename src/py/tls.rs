//! `framesock.ServerTLS` and `framesock.ClientTLS`: TLS settings, checked when made.

use std::path::PathBuf;

use pyo3::exceptions::PyValueError;
use pyo3::prelude::*;

use crate::py::named;
use pyo3::types::PyBytes;

use crate::engine::tls::{self, Pem};

/// A certificate, key or CA argument: PEM `bytes`, or the path of a PEM file.
fn pem(argument: &str, value: &Bound<'_, PyAny>) -> PyResult<Pem> {
    if let Ok(bytes) = value.cast::<PyBytes>() {
        return Ok(Pem {
            text: bytes.as_bytes().to_vec(),
            origin: format!("{argument} (the PEM bytes given)"),
        });
    }
    let path: PathBuf = value
        .extract()
        .map_err(|_| PyValueError::new_err(format!("{argument} must be a path or PEM bytes")))?;
    Pem::from_file(argument, &path).map_err(bad)
}

fn optional_pem(argument: &str, value: Option<&Bound<'_, PyAny>>) -> PyResult<Option<Pem>> {
    value.map(|value| pem(argument, value)).transpose()
}

fn bad(err: tls::BadSettings) -> PyErr {
    PyValueError::new_err(err.0)
}

/// A server's TLS settings; immutable, reusable by any number of servers.
#[pyclass(frozen, module = "framesock", name = "ServerTLS")]
pub struct ServerTls {
    pub settings: tls::ServerTls,
}

#[pymethods]
impl ServerTls {
    #[new]
    #[pyo3(signature = (cert, key, *, client_ca = None))]
    fn new(
        cert: &Bound<'_, PyAny>,
        key: &Bound<'_, PyAny>,
        client_ca: Option<&Bound<'_, PyAny>>,
    ) -> PyResult<Self> {
        let cert = pem("cert", cert)?;
        let key = pem("key", key)?;
        let client_ca = optional_pem("client_ca", client_ca)?;
        let settings = tls::ServerTls::new(&cert, &key, client_ca.as_ref()).map_err(bad)?;
        Ok(ServerTls { settings })
    }

    /// Whether clients must present a certificate (mutual TLS).
    #[getter]
    fn requires_client_certificate(&self) -> bool {
        self.settings.requires_client_certificate
    }

    fn __repr__(&self) -> String {
        let mutual = if self.settings.requires_client_certificate {
            "True"
        } else {
            "False"
        };
        format!("<framesock.ServerTLS requires_client_certificate={mutual}>")
    }
}

/// A client's TLS settings; immutable, reusable by any number of clients.
#[pyclass(frozen, module = "framesock", name = "ClientTLS")]
pub struct ClientTls {
    pub settings: tls::ClientTls,
}

#[pymethods]
impl ClientTls {
    #[new]
    #[pyo3(signature = (ca = None, *, cert = None, key = None, server_name = None))]
    fn new(
        ca: Option<&Bound<'_, PyAny>>,
        cert: Option<&Bound<'_, PyAny>>,
        key: Option<&Bound<'_, PyAny>>,
        #[pyo3(from_py_with = named::server_name)] server_name: Option<String>,
    ) -> PyResult<Self> {
        let ca = optional_pem("ca", ca)?;
        let cert = optional_pem("cert", cert)?;
        let key = optional_pem("key", key)?;
        let settings = tls::ClientTls::new(ca.as_ref(), cert.as_ref(), key.as_ref(), server_name)
            .map_err(bad)?;
        Ok(ClientTls { settings })
    }

    #[getter]
    fn server_name(&self) -> Option<String> {
        self.settings.server_name.clone()
    }

    fn __repr__(&self) -> String {
        match &self.settings.server_name {
            Some(name) => format!("<framesock.ClientTLS server_name='{name}'>"),
            None => String::from("<framesock.ClientTLS server_name=None>"),
        }
    }
}
