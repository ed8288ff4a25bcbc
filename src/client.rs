//! A small client for the listener's own API, used by the `jobs` commands.

use anyhow::{Context, bail};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::{Method, Request, StatusCode, header};
use hyper_util::rt::TokioIo;

use crate::configuration::Settings;
use crate::domain::Secret;

pub struct ApiClient {
    /// `host:port` of the API.
    authority: String,
    token: Option<Secret>,
}

impl ApiClient {
    /// The API of the configured listener, or `url` (`http://host:port`) when given.
    pub fn new(settings: &Settings, url: Option<&str>) -> anyhow::Result<Self> {
        let authority = match url {
            Some(url) => {
                let Some(rest) = url.strip_prefix("http://") else {
                    bail!("--api-url must start with http:// (got {url})");
                };
                rest.trim_end_matches('/').to_owned()
            }
            None => {
                let mut address = settings.api.listen;
                if address.ip().is_unspecified() {
                    address.set_ip(std::net::Ipv4Addr::LOCALHOST.into());
                }
                address.to_string()
            }
        };
        Ok(Self {
            authority,
            token: settings.api.token.clone().filter(|token| !token.is_empty()),
        })
    }

    /// Sends one request; returns the status and body whatever the status.
    pub async fn send(
        &self,
        method: Method,
        path_and_query: &str,
        json: Option<String>,
    ) -> anyhow::Result<(StatusCode, Bytes)> {
        let stream = tokio::net::TcpStream::connect(&self.authority)
            .await
            .with_context(|| {
                format!(
                    "cannot reach the listener's API at {} (is it running?)",
                    self.authority
                )
            })?;
        let (mut sender, connection) =
            hyper::client::conn::http1::handshake(TokioIo::new(stream)).await?;
        tokio::spawn(connection);
        let mut request = Request::builder()
            .method(method)
            .uri(path_and_query)
            .header(header::HOST, &self.authority)
            .header(header::ACCEPT, "application/json");
        if let Some(token) = &self.token {
            request = request.header(header::AUTHORIZATION, format!("Bearer {}", token.expose()));
        }
        if json.is_some() {
            request = request.header(header::CONTENT_TYPE, "application/json");
        }
        let request = request.body(Full::new(Bytes::from(json.unwrap_or_default())))?;
        let response = sender.send_request(request).await?;
        let status = response.status();
        let body = response.into_body().collect().await?.to_bytes();
        Ok((status, body))
    }
}
