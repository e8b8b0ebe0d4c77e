//! weighbridge_native: the proxy's data path (HTTP/2 forwarding, routing, per-request picks).

use pyo3::prelude::*;

mod engine;
mod grpc;
mod pick;
mod pool;
mod proxy;
mod routing;
mod stats;

#[pymodule]
fn weighbridge_native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<engine::Engine>()?;
    Ok(())
}
