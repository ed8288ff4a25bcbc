//! Callback bodies as the platform sends them, for the simulator, the benchmark and the tests.
//! Shapes follow the seed examples: the SOAP envelope of seed 004, the `CallbackRequest1` upload
//! wrapper of seed 001, `SmsCallbackRequest`, and the REST API's JSON.

use std::fmt::Write;

/// What a carrier-service callback reports for its device.
#[derive(Clone, Copy, Debug)]
pub enum CarrierResult<'a> {
    Activated { mdn: &'a str },
    Deactivated,
    Failed { code: &'a str, message: &'a str },
}

/// The credentials and counters every callback carries.
#[derive(Clone, Copy, Debug)]
pub struct Envelope<'a> {
    pub username: &'a str,
    pub password: &'a str,
    pub callback_count: u32,
    pub max_callback_threshold: u32,
}

impl Default for Envelope<'_> {
    fn default() -> Self {
        Self {
            username: "",
            password: "",
            callback_count: 1,
            max_callback_threshold: 4,
        }
    }
}

/// Escapes text for an XML element.
fn xml_text(value: &str) -> String {
    value
        .replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

/// A CarrierService callback in the SOAP envelope form of seed 004 for one device named by
/// `devices` (kind, identifier) pairs.
pub fn carrier_callback(
    envelope: Envelope<'_>,
    request_id: &str,
    devices: &[(&str, &str)],
    result: CarrierResult<'_>,
) -> String {
    let mut device_elements = String::new();
    for (kind, id) in devices {
        let _ = write!(
            device_elements,
            "<Device><Kind>{kind}</Kind><Identifier>{}</Identifier></Device>",
            xml_text(id)
        );
    }
    let (service, fault, status) = match result {
        CarrierResult::Activated { mdn } => (
            format!(
                "<CarrierService><ChangeDeviceState><Activate>\
                 <DeviceIdentifierCollection><Kind>mdn</Kind><Identifier>{mdn}</Identifier></DeviceIdentifierCollection>\
                 <IpAddress>10.1.2.3</IpAddress><State>Active</State><ServicePlan>M2M_4G</ServicePlan>\
                 <DeviceCredential><Username>{mdn}@vzw3g.com</Username><Password>device-secret-{mdn}</Password></DeviceCredential>\
                 </Activate><Deactivate xsi:nil=\"true\"/></ChangeDeviceState></CarrierService>"
            ),
            "<Fault xsi:nil=\"true\"/>".to_owned(),
            "Success",
        ),
        CarrierResult::Deactivated => (
            "<CarrierService><ChangeDeviceState><Activate xsi:nil=\"true\"/><Deactivate><State>Deactive</State>\
             </Deactivate></ChangeDeviceState></CarrierService>"
                .to_owned(),
            "<Fault xsi:nil=\"true\"/>".to_owned(),
            "Success",
        ),
        CarrierResult::Failed { code, message } => (
            "<CarrierService xsi:nil=\"true\"/>".to_owned(),
            format!(
                "<Fault><faultcode>{}</faultcode><faultstring>{}</faultstring></Fault>",
                xml_text(code),
                xml_text(message)
            ),
            "Failed",
        ),
    };
    format!(
        "<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\">\
         <s:Body xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\">\
         <CallbackRequest xmlns=\"http://nphase.com/unifiedwebservice/v2\"><Username>{}</Username><Password>{}</Password>\
         <RequestId>{request_id}</RequestId>{device_elements}<Data><Data>{service}<PromoChange xsi:nil=\"true\"/>{fault}\
         <Comment xsi:nil=\"true\"/><Status>{status}</Status><CallbackCount>{}</CallbackCount>\
         <MaxCallbackThreshold>{}</MaxCallbackThreshold></Data></Data></CallbackRequest></s:Body></s:Envelope>",
        xml_text(envelope.username),
        xml_text(envelope.password),
        envelope.callback_count,
        envelope.max_callback_threshold,
    )
}

/// One upload line: ICCID, IMEI and its line status.
pub type UploadLine<'a> = (&'a str, &'a str, &'a str);

/// An upload callback in the `CallbackRequest1` form of seed 001 (with its trailing spaces and
/// mixed-case kinds); `counts` are (total, pending, success, failed).
pub fn upload_callback(
    envelope: Envelope<'_>,
    request_id: &str,
    lines: &[UploadLine<'_>],
    counts: (u32, u32, u32, u32),
) -> String {
    let mut body = String::with_capacity(700 + lines.len() * 280);
    let _ = write!(
        body,
        "<CallbackRequest1 xmlns:xsi=\"http://www.w3.org/2001/XMLSchema-instance\"><CallbackRequest>\
         <Username xmlns=\"http://nphase.com/unifiedwebservice/v2\">{} </Username>\
         <Password xmlns=\"http://nphase.com/unifiedwebservice/v2\">{} </Password>\
         <RequestId xmlns=\"http://nphase.com/unifiedwebservice/v2\">{request_id} </RequestId>\
         <Data xmlns=\"http://nphase.com/unifiedwebservice/v2\"><Data><CarrierService xsi:nil=\"true\" />\
         <DeviceService><UploadDevices>",
        xml_text(envelope.username),
        xml_text(envelope.password),
    );
    for (iccid, imei, status) in lines {
        let _ = write!(
            body,
            "<UploadDevicesInfo><DeviceIdentifier><Kind>Iccid </Kind><Identifier>{iccid} </Identifier></DeviceIdentifier>\
             <DeviceIdentifier><Kind>Imei </Kind><Identifier>{imei} </Identifier></DeviceIdentifier>\
             <LineStatus>{} </LineStatus></UploadDevicesInfo>",
            xml_text(status)
        );
    }
    let (total, pending, success, failed) = counts;
    let _ = write!(
        body,
        "<AccountName>acct </AccountName><DeviceSku>SKU1 </DeviceSku>\
         <TotalLineCount>{total} </TotalLineCount><PendingLineCount>{pending} </PendingLineCount>\
         <FailedLineCount>{failed} </FailedLineCount><SuccessLineCount>{success} </SuccessLineCount>\
         </UploadDevices></DeviceService><Fault xsi:nil=\"true\" /><Status xsi:nil=\"true\" />\
         <CallbackCount>{} </CallbackCount><MaxCallbackThreshold>{} </MaxCallbackThreshold></Data></Data>\
         </CallbackRequest></CallbackRequest1>",
        envelope.callback_count, envelope.max_callback_threshold,
    );
    body
}

/// A mobile-originated SMS (EnhancedConnectivityService): no RequestId.
pub fn sms_mo_callback(envelope: Envelope<'_>, mdn: &str, message: &str) -> String {
    format!(
        "<s:Envelope xmlns:s=\"http://schemas.xmlsoap.org/soap/envelope/\"><s:Body>\
         <SmsCallbackRequest xmlns=\"http://nphase.com/unifiedwebservice/v2\"><Username>{}</Username><Password>{}</Password>\
         <Device><Kind>MDN</Kind><Identifier>{mdn}</Identifier></Device>\
         <SmsMessage><Message>{}</Message></SmsMessage>\
         <CallbackCount>{}</CallbackCount><MaxCallbackThreshold>{}</MaxCallbackThreshold>\
         </SmsCallbackRequest></s:Body></s:Envelope>",
        xml_text(envelope.username),
        xml_text(envelope.password),
        xml_text(message),
        envelope.callback_count,
        envelope.max_callback_threshold,
    )
}

/// The REST API's JSON form of a carrier-service callback.
pub fn json_carrier_callback(
    envelope: Envelope<'_>,
    request_id: &str,
    devices: &[(&str, &str)],
    result: CarrierResult<'_>,
) -> String {
    let device_ids: Vec<serde_json::Value> = devices
        .iter()
        .map(|(kind, id)| serde_json::json!({"id": id, "kind": kind}))
        .collect();
    let mut callback = serde_json::json!({
        "username": envelope.username,
        "password": envelope.password,
        "requestId": request_id,
        "deviceIds": device_ids,
        "callbackCount": envelope.callback_count,
        "maxCallbackThreshold": envelope.max_callback_threshold,
    });
    match result {
        CarrierResult::Activated { mdn } => {
            callback["deviceResponse"] = serde_json::json!({"activateResponse": {
                "deviceIds": [{"id": mdn, "kind": "MDN"}], "servicePlan": "M2M_4G", "state": "active"}});
            callback["status"] = "Success".into();
        }
        CarrierResult::Deactivated => {
            callback["deviceResponse"] =
                serde_json::json!({"deactivateResponse": {"state": "deactive"}});
            callback["status"] = "Success".into();
        }
        CarrierResult::Failed { code, message } => {
            callback["faultResponse"] =
                serde_json::json!({"faultcode": code, "faultstring": message});
            callback["status"] = "Failed".into();
        }
    }
    callback.to_string()
}
