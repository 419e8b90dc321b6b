// A small JVM HTTP service (the JDK's own com.sun.net.httpserver) for the
// JVM tests: answers "nonce N" where N is fixed at its (cold) start.
import com.sun.net.httpserver.HttpServer;
import java.net.InetSocketAddress;
public class Hello {
    public static void main(String[] a) throws Exception {
        int port = Integer.parseInt(a[0]);
        long nonce = System.nanoTime();
        // Some start-up work, as a JVM service has.
        StringBuilder sb = new StringBuilder();
        for (int i = 0; i < 200000; i++) sb.append(Integer.toHexString(i * 31));
        HttpServer s = HttpServer.create(new InetSocketAddress("127.0.0.1", port), 0);
        s.createContext("/", ex -> {
            byte[] b = ("nonce " + nonce + "\n").getBytes();
            ex.sendResponseHeaders(200, b.length);
            ex.getResponseBody().write(b);
            ex.close();
        });
        s.start();
        System.out.println("hello ready on " + port);
    }
}
