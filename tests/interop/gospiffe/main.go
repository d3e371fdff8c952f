// Command gospiffe-interop checks svidgate against go-spiffe v2, the SPIFFE library Go
// workloads use: (a) it verifies a JWT-SVID minted by svidgate's signer with
// jwtsvid.ParseAndValidate against the signer's discovery endpoint (/bundle as a SPIFFE
// bundle, or /keys as a JWKS), and (b) it calls the gateway over mTLS with
// tlsconfig.MTLSClientConfig, an X.509-SVID and a bundle loaded from files, authorizing the
// gateway's SPIFFE ID. It prints one JSON line and exits 0 on success, 1 on any failure.
//
//	gospiffe-interop jwt  -url http://127.0.0.1:8081/bundle -format spiffe -td example.org \
//	                      -audience orders -token-file token.jwt
//	gospiffe-interop mtls -url https://127.0.0.1:8443/orders -cert web.crt -key web.key \
//	                      -bundle bundle.pem -td example.org -server-id spiffe://example.org/gateway
package main

import (
	"context"
	"encoding/json"
	"errors"
	"flag"
	"fmt"
	"io"
	"net/http"
	"os"
	"strings"
	"time"

	"github.com/spiffe/go-spiffe/v2/bundle/jwtbundle"
	"github.com/spiffe/go-spiffe/v2/bundle/spiffebundle"
	"github.com/spiffe/go-spiffe/v2/bundle/x509bundle"
	"github.com/spiffe/go-spiffe/v2/spiffeid"
	"github.com/spiffe/go-spiffe/v2/spiffetls/tlsconfig"
	"github.com/spiffe/go-spiffe/v2/svid/jwtsvid"
	"github.com/spiffe/go-spiffe/v2/svid/x509svid"
)

const maxBody = 1 << 20

func main() {
	if len(os.Args) < 2 {
		fail(errors.New("usage: gospiffe-interop jwt|mtls [flags]"))
	}
	var out map[string]any
	var err error
	switch os.Args[1] {
	case "jwt":
		out, err = runJWT(os.Args[2:])
	case "mtls":
		out, err = runMTLS(os.Args[2:])
	default:
		err = fmt.Errorf("unknown command %q", os.Args[1])
	}
	if err != nil {
		fail(err)
	}
	out["ok"] = true
	_ = json.NewEncoder(os.Stdout).Encode(out)
}

func fail(err error) {
	_ = json.NewEncoder(os.Stdout).Encode(map[string]any{"ok": false, "error": err.Error()})
	os.Exit(1)
}

func get(client *http.Client, url string) ([]byte, int, error) {
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, url, nil)
	if err != nil {
		return nil, 0, err
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, 0, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxBody))
	return body, resp.StatusCode, err
}

func runJWT(args []string) (map[string]any, error) {
	fs := flag.NewFlagSet("jwt", flag.ContinueOnError)
	url := fs.String("url", "", "the signer's /bundle or /keys URL")
	format := fs.String("format", "spiffe", "spiffe (a SPIFFE bundle) or jwks")
	td := fs.String("td", "", "trust domain of the bundle")
	audience := fs.String("audience", "", "expected audience")
	tokenFile := fs.String("token-file", "", "file holding the JWT-SVID")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	trustDomain, err := spiffeid.TrustDomainFromString(*td)
	if err != nil {
		return nil, err
	}
	body, status, err := get(http.DefaultClient, *url)
	if err != nil {
		return nil, err
	}
	if status != http.StatusOK {
		return nil, fmt.Errorf("GET %s: status %d", *url, status)
	}
	var bundle *jwtbundle.Bundle
	switch *format {
	case "spiffe":
		sb, err := spiffebundle.Parse(trustDomain, body)
		if err != nil {
			return nil, err
		}
		bundle = sb.JWTBundle()
	case "jwks":
		if bundle, err = jwtbundle.Parse(trustDomain, body); err != nil {
			return nil, err
		}
	default:
		return nil, fmt.Errorf("unknown format %q", *format)
	}
	raw, err := os.ReadFile(*tokenFile)
	if err != nil {
		return nil, err
	}
	svid, err := jwtsvid.ParseAndValidate(strings.TrimSpace(string(raw)), bundle, []string{*audience})
	if err != nil {
		return nil, err
	}
	return map[string]any{"subject": svid.ID.String(), "audience": svid.Audience, "keys": len(bundle.JWTAuthorities())}, nil
}

func runMTLS(args []string) (map[string]any, error) {
	fs := flag.NewFlagSet("mtls", flag.ContinueOnError)
	url := fs.String("url", "", "gateway URL")
	certFile := fs.String("cert", "", "the client's X.509-SVID (PEM chain)")
	keyFile := fs.String("key", "", "its private key (PEM)")
	bundleFile := fs.String("bundle", "", "the trust domain's bundle (PEM)")
	td := fs.String("td", "", "trust domain of the bundle")
	serverID := fs.String("server-id", "", "the gateway's SPIFFE ID (authorized)")
	token := fs.String("token-file", "", "optional JWT for Authorization: Bearer")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	svid, err := x509svid.Load(*certFile, *keyFile)
	if err != nil {
		return nil, err
	}
	trustDomain, err := spiffeid.TrustDomainFromString(*td)
	if err != nil {
		return nil, err
	}
	bundle, err := x509bundle.Load(trustDomain, *bundleFile)
	if err != nil {
		return nil, err
	}
	id, err := spiffeid.FromString(*serverID)
	if err != nil {
		return nil, err
	}
	tlsConfig := tlsconfig.MTLSClientConfig(svid, bundle, tlsconfig.AuthorizeID(id))
	client := &http.Client{Transport: &http.Transport{TLSClientConfig: tlsConfig}, Timeout: 10 * time.Second}
	ctx, cancel := context.WithTimeout(context.Background(), 10*time.Second)
	defer cancel()
	req, err := http.NewRequestWithContext(ctx, http.MethodGet, *url, nil)
	if err != nil {
		return nil, err
	}
	if *token != "" {
		raw, err := os.ReadFile(*token)
		if err != nil {
			return nil, err
		}
		req.Header.Set("Authorization", "Bearer "+strings.TrimSpace(string(raw)))
	}
	resp, err := client.Do(req)
	if err != nil {
		return nil, err
	}
	defer resp.Body.Close()
	body, err := io.ReadAll(io.LimitReader(resp.Body, maxBody))
	if err != nil {
		return nil, err
	}
	return map[string]any{"status": resp.StatusCode, "body": string(body), "client_id": svid.ID.String()}, nil
}
