//! Internal callers by client certificate (optional mTLS on the internal listener): the
//! TLS handshake has already verified the certificate against DEVGATE_INTERNAL_TLS_CLIENT_CA;
//! the caller is the configured service named by the certificate's first DNS name.

use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};

/// The name of the verified client certificate of this call's connection, if any.
pub fn peer_name<B>(req: &http::Request<B>) -> Option<String> {
    let info = req.extensions().get::<TlsConnectInfo<TcpConnectInfo>>()?;
    let certs = info.peer_certs()?;
    let leaf = certs.first()?;
    let cert = webpki::EndEntityCert::try_from(leaf).ok()?;
    cert.valid_dns_names().next().map(str::to_string)
}
