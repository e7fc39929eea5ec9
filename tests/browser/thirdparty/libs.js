// The entry esbuild bundles at test time (thirdparty.test.js): Eyevinn's WHIP client and WHEP
// player, as npm ships them (their dist files import bare module names, so a browser cannot
// load them as they are), exposed to the test page as globals.
import { WHIPClient } from '@eyevinn/whip-web-client/dist/whip-client.m.js';
import { WebRTCPlayer } from '@eyevinn/webrtc-player/dist/main.js';

window.WHIPClient = WHIPClient;
window.WebRTCPlayer = WebRTCPlayer;
