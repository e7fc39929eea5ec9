// temporary stub to warm the build cache; replaced below
use webrtc::peer_connection::PeerConnectionBuilder as _B;
fn main() {
    let _ = tokio_tungstenite::connect_async::<&str>;
    println!("stub");
}
