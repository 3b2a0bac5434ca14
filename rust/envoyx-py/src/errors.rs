//! The one place where core errors become Python exceptions.
//!
//! The classes live in the public module `envoyx.errors` (not in `_core`), so users
//! catch `envoyx.ConfigError`, never a private type.

use envoyx_core::Error;
use pyo3::exceptions::PyRuntimeError;
use pyo3::prelude::*;

fn raise<A>(class: &str, args: A) -> PyErr
where
    A: for<'py> pyo3::call::PyCallArgs<'py>,
{
    Python::attach(|py| {
        let made = py
            .import("envoyx.errors")
            .and_then(|m| m.getattr(class))
            .and_then(|cls| cls.call1(args));
        match made {
            Ok(exc) => PyErr::from_value(exc),
            Err(e) => e,
        }
    })
}

pub fn to_py_err(e: Error) -> PyErr {
    match e {
        Error::Config(errors) => raise("ConfigError", (errors,)),
        Error::Bind { ref source, .. } => {
            let errno = source.raw_os_error().unwrap_or(0);
            raise("BindError", (errno, e.to_string()))
        }
        Error::Io { .. } => raise("EnvoyxError", (e.to_string(),)),
        Error::State(msg) => PyRuntimeError::new_err(msg),
    }
}
